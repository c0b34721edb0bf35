"""One module per memory term. Each function takes only what its term depends on; ``estimator`` assembles them."""
