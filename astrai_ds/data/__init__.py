"""Data: tokenizer, built-in corpus, token shards, datasets and the resumable sampler.

Modules, in pipeline order: `sources` (reading .txt/.jsonl), `tokenizer`, `corpus`, `chat` (ChatML rendering
and checks of SFT/DPO records), `prepare` (text -> shards), `shards`, `datasets`, `sampler`. Nothing here
imports DeepSpeed, and only `datasets` imports torch, so import the modules you need rather than this
package's namespace.
"""
