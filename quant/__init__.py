"""The quantization driver's parts that gptq.py's loop calls: the grid and packed runtime linear (grid.py), the
folders on disk (folders.py), and the optional steps: the batched all-experts solver (batched.py), scale searches
(scales.py), the vision tower (vision.py), several processes (distributed.py); and where vLLM would run the output
(servable.py)."""
