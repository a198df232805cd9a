"""R-Sparse activation sparsity: plans (plan.py) and the fast CPU decode path."""
