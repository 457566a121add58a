"""The ground floor: config base, filesystem, tokens, pre-processing settings, resizing, pictures."""
