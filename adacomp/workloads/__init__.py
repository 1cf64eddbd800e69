"""Workloads: the main job and the models and data sets of the evidence runs (not the library).

The algorithm and the integrations do not depend on this package, and of the stages only
the SGA / bits-back one does (it writes the codec's bitstreams). It holds what runs the
library on real data:

* :mod:`~adacomp.workloads.training`: the main job (``launch/train.py``): data-parallel
  training that compares gradient compressors side by side;
* :mod:`~adacomp.workloads.data`: the data locator (digits, MNIST, Fashion-MNIST,
  Shakespeare, ATIS, photographs) and batch iterators; ``python -m adacomp.workloads.data``;
* :mod:`~adacomp.workloads.models`: the CNN and char-LSTM of the training runs and examples;
* :mod:`~adacomp.workloads.nlu`: the joint intent / slot-filling BiLSTM on ATIS (the
  embedding stage's workload);
* :mod:`~adacomp.workloads.codec`: the small learned image codec that the SGA / bits-back
  stage refines.
"""
