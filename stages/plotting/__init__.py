"""Figures of the study: matplotlib image grids and histograms (PNG), data for DVC's Vega-Lite plots.

The stage scripts (stages/overview.py, figures.py, tsne.py, summary_figure.py, plots_page.py) parse
params and call these modules; nothing here reads params.yaml.
"""
