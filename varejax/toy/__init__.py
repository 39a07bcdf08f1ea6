"""The toy world: a miniature, trained Infinity on which concept erasure runs on a laptop CPU in minutes.

* `world`: a seeded generator of 64x64 images of coloured shapes on patterned backgrounds, with their
  attribute labels and prompts in two disjoint families (`seen` and `paraphrase`), and the concept /
  anchor prompt helpers the erasure job builds its pairs from.
* `oracle`: a small CNN that reads the attributes back from an image (the toy world's detector), and
  its penultimate features for a Frechet distance.
* `train`: trains everything from scratch in JAX (oracle, BSQ-VAE tokenizer, T5 + Infinity jointly)
  and writes model folders that `Pipeline.from_dirs` loads unchanged (`varejax toy train`): its stages
  (reuse-or-train, timed) and world.json; `trainers` (what each stage trains) and `fit` (the one loop).
* `evaluate`: prompt following read by the oracle, per family, attribute and value (`varejax toy eval`).
* `spec`: the fixed layout (schedules, text length, file names) shared by training, assets and evaluation.
* `assets`: the shipped, trained models (`load_toy_pipeline`, `load_toy_oracle`, `TOY_SCHEDULE`).
* `job`: the main job (`varejax erase --config configs/toy_circle.py`).
"""
