"""The tooling that drives the roles: the ``edgemole`` command line and what it runs (an emulated fleet, the method
benchmark and its reports, flashing devices, the fleet's status).

It sits above the role packages (``edge_client``, ``aggregator``, ``export``) and the shared core (``edgemole``); no
role and nothing in the core imports it.
"""
