"""Reports: class-wise accuracy vs MIS, MIS vs pruning rate, per-layer tables, figures, HTML."""
