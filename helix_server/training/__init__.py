"""Training of the embedded default model: a small Python-completion Llama and its draft.

`helix-server train-default` (see `recipe.train_default`) selects the Python standard library's own
source files (split into training and held-out sets by file), trains a byte-level BPE tokenizer, a
target model and a much smaller draft model, distils the draft on the target's next-token
distributions, evaluates both on the held-out files and saves them as Hugging Face directories.

Only torch, transformers, tokenizers and safetensors are needed; nothing here is imported by the
serving path. Modules: `corpus` (file selection and split), `data` (token stream and batches),
`presets` (model sizes and schedules), `loop` (AdamW + cosine + clipping), `distill` (the loss),
`evaluate` (held-out loss and draft/target agreement), `export` (HF directories), `recipe` (the
whole run).
"""
