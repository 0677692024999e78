"""Figures and tables of the paper, regenerated from ``results/`` (``python main_figures/make_figures.py``),
plus the theory experiment (``main_figures/theory.py``) and the one-command CPU reproduction
(``main_figures/reproduce_cpu.py``)."""
