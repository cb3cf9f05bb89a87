"""Evaluate saved LDIFS runs for concept forgetting (completed in the evaluation issue)."""
import sys

if __name__ == "__main__":
    sys.exit("eval.py: error: not implemented yet; ldifs.py prints each run's test accuracy")
