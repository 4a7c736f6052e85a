"""winback's domain: history schema, error catalog, rules, features, models and the policy.

Pure Python plus numpy/pandas/lightgbm/scikit-learn: no web framework, no database.
"""
