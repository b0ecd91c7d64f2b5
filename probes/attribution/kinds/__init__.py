"""The kinds of evidence, one module each (see :class:`headprobe.probes.attribution.evidence.EvidenceKind`)."""
