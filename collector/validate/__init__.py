"""`memcgscope validate`: the model checked against a real kernel.

plan.py     a scenario read for validation (what to run, tolerances)
runner.py   the scenario on the real kernel: scratch cgroups, workers, end state
worker.py   the process a scenario task runs as
compare.py  the model's side and the field-by-field comparison
suite.py    one validation run: applicability, episodes through the pipeline
setup.py    what a run needs (hierarchy, scratch parent, session, profile)
command.py  `validate -- CMD`: a user's command under observation
report.py   the table and JSON
"""
