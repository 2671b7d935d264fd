"""Training: the loop and everything one run needs.

`loop` (set-up · steps · finish) drives a run; `model` builds the model it trains (the method, then
`kernels.prepare`'s fast paths), the same for `fit`'s probes; `rows` orders the data; `step` computes
one step's gradients and validation; `loss` is the chunked cross-entropy; `checkpoint` saves and
resumes exactly; `distributed` wraps DDP/FSDP under torchrun; `records` logs metrics; `fit`,
`fit_report` and `budget` predict whether a run fits before it starts.
"""
