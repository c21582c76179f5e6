"""Past one machine: tensor parallelism on torch.distributed (`plans`: what each architecture splits, as data;
`tensor_parallel`: the process group, the per-rank model and the slices each rank reads)."""
