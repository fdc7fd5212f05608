"""The data path, one module per job, in the order rows flow:

    reading     a dataset (local files, a dataset directory or hub dataset, builtin) -> checked examples
    formatting  an example -> prompt-masked, tokenized ids and labels
    packing     tokenized examples -> packed rows -> per-worker, per-epoch shuffled micro batches
    cache       rows built once, saved as Arrow files, memory-mapped by every worker
    streaming   the same rows from a corpus larger than memory, in one pass
    prepare     which of the two a run takes (``Plan.streaming``)
"""
