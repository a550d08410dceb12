"""Cost models: one per mode, modelled kernel memory and rule-update cost."""
