import os
import sys

# Let tests import the top-level scripts (model.py, data.py, ...) as modules, from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
