"""``fedfms experiment CONFIG``: the papers' comparisons as one file of methods x settings, run cell by cell.

One YAML or JSON file names the prepared data and partition, the methods (a bundle, its
strategy, pretrained or "-PT"), the settings (``local``: each site alone; ``centralized``: the
training sites pooled; ``federated``; ``loso``: federated with the partition's unseen site
scored), rounds, epochs and seed (:mod:`fedfms.experiment.config`). Every method x setting is a
cell with a stable id such as ``fedmsa-federated`` (:mod:`fedfms.experiment.cells`). Each cell
runs as the real thing in a process of its own (:mod:`fedfms.experiment.cell`): local and
centralized training through the bundles' own workflow, federated training through
``nvflare simulator`` on a ``fedfms job`` copy. The runner (:mod:`fedfms.experiment.runner`)
runs them one at a time, skips finished ones and records failed ones with their reason. The
report (:mod:`fedfms.experiment.report`) writes the FedFMS and FLAP-SAM Table 1 layouts
(:mod:`fedfms.experiment.tables`) and the figures (:mod:`fedfms.experiment.figures`).
"""
