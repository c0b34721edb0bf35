"""The calibration harness: ``python -m vramcalc.calibrate`` measures real training steps and refits the runtime
coefficients of the estimate for a GPU model (see ``__main__`` for the command, ``calibration/README.md`` for the
files).

Modules, one concern each:
  scenarios  what to measure: the default grid, scenario files, budget order
  training   the model and Trainer step, built and run on a real device
  probes     what is read (torch.cuda peaks, NVML, the CPU tracker) and the measurement protocol
  worker     one scenario in a fresh process
  records    the crash-safe measurement CSV
  runner     scenarios one worker at a time, within the budget
  fit        least squares of the runtime coefficients, leave-one-out, the profile JSON
  report     summary table and plot

Importing this package imports neither torch nor numpy: the workers and the fit import them where used.
"""
