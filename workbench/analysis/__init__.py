"""Analysis shared by methods and records: calibration groups and spread (`robustness`), the per-type
allocation under a size budget (`mixed_precision`), llama.cpp's importance matrix (`imatrix`) and the
per-layer quantization sensitivity probe (`sensitivity`).

Imports `data` and the foundation modules at module level; never `running`, `config`, `views` or `ui`
(the methods sit above this package and import it).
"""
