"""`moemerge ensemble`: keep several models apart and combine their outputs at inference.

`combine` holds the pure maths (weighted probability / logit averaging, perplexity weights, ROUGE-L,
crowd vote, token choice), `members` loads the models after checking their vocabularies, `decode` runs
the step loop with one KV cache per model, `score` the mean cross-entropy of members and ensemble.
`exchange` holds the text-level methods (Exchange-of-Thought rounds, fuse) as pure functions of reply
callables, and `speakers` makes those callables from loaded models, each with its own tokenizer.
"""
