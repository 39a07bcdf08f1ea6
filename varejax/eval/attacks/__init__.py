"""Attacks on an erasure: how often does the erased concept come back?

* `paraphrase`: prompts that describe the concept without naming it (toy world: the paraphrase family;
  real models: a CSV/JSONL prompt file with `case_number, prompt, evaluation_seed`).
* `ring_a_bell`: a concept direction in T5-feature space and a genetic search over tokens for prompts
  without the concept's words whose features carry it.
* `gradient`: a soft prompt in T5-feature space optimised through the attacked model (teacher-forced bit
  cross entropy of concept trajectories), in the spirit of UnlearnDiffAtk.
* `asr`: attack success rates before and after erasure (`run_attacks`).
"""
