"""Seeing what a pipeline does: simulate and validate schedules, trace real runs, draw both, meter activations.

Each module here reads schedules and traces; none of them changes how training runs. Import the one you need
(``ds_pipe_ext.observe.simulation``, ``.trace``, ``.draw``, ``.memory``): drawing needs matplotlib.
"""
