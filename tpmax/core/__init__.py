"""The functional tensor layer: devices and arrays on them, the communicators, the split rule and the
sharding table, and running one function per device.
"""
