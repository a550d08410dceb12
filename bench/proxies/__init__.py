"""Writers: one per mode, cluster → the rule text kube-proxy would program."""
