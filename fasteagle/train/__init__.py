"""Draft-head training: self-distilled data from the target, the EAGLE training loop, and the tau evaluation.

    python -m fasteagle.train gen-data ...   # data.py: the target answers prompts; tokens + features -> shards
    python -m fasteagle.train fit ...        # loop.py: smooth-L1 feature regression + 0.1 x soft CE
    python -m fasteagle.train eval ...       # evaluate.py: EAGLE-2 greedy tau on MT-bench first turns
    python -m fasteagle.train all ...        # the three in a row
"""
