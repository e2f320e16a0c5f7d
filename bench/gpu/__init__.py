"""bench/gpu_check.py's parts: stage runs and their comparisons (runs), the agreement and resume
checks (checks), realistic JPEGs (photos), the speed rates (speed) and the fp32 stage runner
(fp32_stage)."""
