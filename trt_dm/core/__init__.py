"""The project's shared vocabulary, importing nothing else of trt_dm: the UNet's input signature
(``signature``) and the artifacts every stage reads or writes (``artifacts``: atomic writes, hashes, range
sets, export reports, engine sidecars)."""
