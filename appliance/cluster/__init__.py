"""Clustered dirty logs: one mirror shared by several hosts, its region log kept coherent by a
log service (dm-log-userspace's split: the mirror asks, the service answers). `protocol` is the
wire format and both ends' state machines, without any I/O."""
