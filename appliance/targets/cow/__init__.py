"""cow: a stack of copy-on-write layers over a base device (issue 10).

Only the parts that do not depend on the request path are here yet: the on-disk layer
(layer.py) and the `appliance layer` commands (command.py). The `Cow` target class does not
exist yet, so the registry does not offer `cow` as a table keyword.
"""
