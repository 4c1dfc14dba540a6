"""The long-context evaluation tasks: one module per task family, and the registry of them all.

registry.py maps every task name to its sample builder, answer budget and metric (start there
to add a task). The families: niah.py (RULER's eight needle-in-a-haystack tasks), passkey.py,
variable_tracking.py (vt), word_extraction.py (cwe, fwe), qa.py (qa_1 SQuAD, qa_2 HotpotQA) and
synthetic_kv.py (the CPU replication's word-level key/value task). What they share: samples.py
(the `EvalSample` a builder returns, the `TaskSetting` it is given, tokenizer-exact sizing),
haystack.py (haystack text and needle generators, with the shipped prose in data/), chat.py (how
a question becomes the prompt text) and ruler_rules.py (RULER's own rules and templates).
"""
