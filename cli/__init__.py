"""Every ``inferq`` command: ``main.py`` builds the command line; each other module is one
command group (models, top, autoscale, drift, dead-letters, demo). Commands import what
they run: the SDK (``producer``), the API server (``api``) or a worker (``workers``)."""
