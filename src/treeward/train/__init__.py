"""Small, readable training loops for the shipped models, and the trainer integrations.

Import the module you need (each loads torch and transformers; ``treeward.train.trl_tree`` also loads trl):

* :mod:`~treeward.train.sft` (``train_sft``), :mod:`~treeward.train.prefs` (``train_dpo``, ``train_tpo``) and
  :mod:`~treeward.train.value` (``train_value``: outcome RMs and PRMs), all on the one loop in ``_loop.fit``;
* :mod:`~treeward.train.pg` (``train_pg``: online policy gradient with token-level advantages);
* :mod:`~treeward.train.prm` (the learned-PRM pipeline) and :mod:`~treeward.train.selftrain` (ReST-MCTS*,
  ReST-EM, MCTS-DPO; ``treeward selftrain``);
* :mod:`~treeward.train.trl_tree` (``TreeGRPOTrainer``) and :mod:`~treeward.train.verl_tree` (a verl advantage
  estimator);
* :mod:`~treeward.train.pretrain` (how the shipped policy was trained).
"""
