# Argument checks shared by the experiment scripts (sourced, not run): a missing or unknown choice stops the
# script with a message listing the valid ones, before anything runs. The script sets USAGE first.

# options_of DIR: the options of a config group folder, i.e. the names of DIR/*.yaml without the extension.
options_of() {
  local file names=()
  for file in "$1"/*.yaml; do
    [ -e "$file" ] && names+=("$(basename "$file" .yaml)")
  done
  echo "${names[*]}"
}

# top_level_keys FILE: the top-level keys of a YAML mapping (the lines `key:` that start in column 0).
top_level_keys() {
  local keys
  keys=$(sed -n 's/^\([A-Za-z0-9_][A-Za-z0-9_-]*\):.*/\1/p' "$1")
  echo $keys  # unquoted: one line, separated by single spaces
}

# require_choice WHAT VALUE "OPTION OPTION ...": return if VALUE is one of the options, else exit with status 2.
require_choice() {
  local what=$1 value=$2 option
  for option in $3; do
    [ "$value" = "$option" ] && return 0
  done
  if [ -z "$value" ]; then
    echo "error: missing $what; valid: $3" >&2
  else
    echo "error: unknown $what '$value'; valid: $3" >&2
  fi
  echo "${USAGE:-}" >&2
  exit 2
}
