"""Running scenarios on real hardware with PyTorch: the replayer (model, engine, run), `emoe profile`,
`emoe compare`, expert-restricted quality (`emoe accuracy`, `emoe sensitivity`) and the GPU check."""
