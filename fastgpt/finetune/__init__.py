"""Fine-tuning a pretrained GPT.

config.py      what a run is: ClassifyConfig, InstructConfig, DPOConfig (flags, files, resume: fastgpt.train.options)
classifier.py  the classifier network: a GPT body and a head on the last real token
classify.py    text classifier: labelled data, balancing, splits, training, metrics
instruct.py    instruction following: records, collate (targets, masking), training, responses, scoring
dpo.py         preference pairs, masked log-probabilities, the DPO loss, cached reference, the dpo run
run.py         the step-by-step run instruct and dpo share: trainable model, checkpoints, resume, loop, save
templates.py   prompt templates (alpaca, phi3); the model records its own in metadata["template"]
lora.py        low-rank adapters: LoRALinear, apply_lora, merge_lora, adapter files
trainable.py   what learns (--trainable last-n / all / lora), the same for every task
checkpoint.py  loading the starting model; saving classifiers (head + labels) and instruction models
files.py       reading user files with errors that name file and line; atomic writes
"""
