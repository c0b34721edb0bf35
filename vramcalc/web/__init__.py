"""``vramcalc web``: a local page and JSON API over the estimator (standard library ``http.server``, no dependency).

Imported only by the ``web`` command (``import vramcalc`` does not import it). ``server.make_server`` binds one;
``server.serve`` runs it until Ctrl-C; ``schema.setup_fields`` is the form, generated from ``TrainingSetup``.
"""
