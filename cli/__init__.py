"""The command line and the REST client: the top layer, over ``api/`` and ``service/``.

``cli.app`` is the ``maml`` command (typer), ``cli.client`` a small typed client of the REST API
shared by the command and the demo, ``cli.demo`` what ``make run`` runs. Nothing below imports it.
"""
