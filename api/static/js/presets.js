// Job specs to start from (the Submit page): the MAML paper's setups (Finn et al. 2017).

export const PRESETS = {
  sinusoid: {
    label: "Sinusoid (paper)",
    spec: {
      name: "sine", algorithm: "maml",
      task: { family: "sinusoid", shots: 10, queries: 10 },
      model: { name: "mlp" },
      inner: { steps: 1, lr: 0.01 },
      outer: { optimizer: "adam", lr: 0.001, meta_batch_size: 25, iterations: 2000 },
      eval: { every: 500, tasks: 100, steps: 10 },
      resources: { workers: 1, gpus_per_worker: 0 },
      seed: 0,
    },
  },
  omniglot: {
    label: "Omniglot 5-way 1-shot",
    spec: {
      name: "omniglot-5w1s", algorithm: "maml",
      task: { family: "omniglot", ways: 5, shots: 1, queries: 1, split: "paper" },
      model: { name: "conv4" },
      inner: { steps: 1, lr: 0.4 },
      outer: { optimizer: "adam", lr: 0.001, meta_batch_size: 32, iterations: 60000 },
      eval: { every: 1000, tasks: 100, steps: 10 },
      seed: 0,
    },
  },
  nav2d: {
    label: "2D navigation (meta-RL)",
    spec: { name: "nav", algorithm: "maml", task: { family: "nav2d" }, outer: { iterations: 100 } },
  },
};
