"""Small shared helpers every layer may use: the typed params (``params``), the project's file
locations (``paths``), the user-fixable error (``errors``), atomic writes (``atomic``), DVC report
files (``reports``), figures (``plots``), seeding (``seeding``), how a stage process ends
(``lifecycle``) and the params recipes (``recipe``). It imports only the standard library and
third-party packages, never another catdog subpackage (one exception, named in tests/test_layers.py:
the ``train.arch`` check reads the architecture names from ``catdog.models.architectures``).
"""
