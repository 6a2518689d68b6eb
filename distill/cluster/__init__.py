"""Ray lives here and only here: actor wrappers, groups, placement, buffer actors, the driver loop."""
