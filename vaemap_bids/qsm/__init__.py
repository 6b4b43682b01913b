"""Quantitative susceptibility mapping (QSM) from multi-echo gradient echo (BIDS MEGRE):
the dipole model (:mod:`.dipole`), the field steps (:mod:`.field`), the inversions
(:mod:`.inversion`: TKD, TV; :mod:`.dip`: Deep Image Prior), metrics, the phantom, the BIDS input
checks (:mod:`.inputs`) and the pipeline functions the Nipype nodes call (:mod:`.pipeline`)."""
