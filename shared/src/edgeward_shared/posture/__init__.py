"""Device posture: seed 000's commissioning checklist as attested claims (docs/adr/0026).

:mod:`.report` is the wire model and the requirement check, :mod:`.checks` the pure
decisions, :mod:`.collect` the reading of a real system below a root path.
"""
