"""Data in and records kept: model sources and their fingerprints (`sources`), eval and calibration text
(`evaltext`, `calibration`), the checks that tokens can be scored correctly (`validity`), GGUF metadata,
vocabulary and writing (`gguf_info`, `gguf_vocab`, `gguf_write`) and the run history (`store`).

Imports only the foundation modules (`errors`, `paths`, `cache`, `process`, `pathfield`) at module level;
never `running`, `views` or `ui`.
"""
