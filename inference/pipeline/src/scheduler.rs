//! Flow-matching Euler sampling with a shifted schedule, reproducing diffusers'
//! `FlowMatchEulerDiscreteScheduler` (1000 training steps, static shift) value for value.

/// The noise levels of a sampling run.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowMatchSchedule {
    /// Model timesteps (`sigma * 1000`), one per step.
    pub timesteps: Vec<f32>,
    /// Noise levels, one per step plus the final 0.
    pub sigmas: Vec<f32>,
}

fn shift_sigma(shift: f64, s: f64) -> f64 {
    shift * s / (1.0 + (shift - 1.0) * s)
}

impl FlowMatchSchedule {
    /// The schedule for `steps` steps with `shift` (3.0 for SD3.5).
    pub fn new(steps: usize, shift: f64) -> Self {
        const TRAIN_STEPS: f64 = 1000.0;
        // The smallest training sigma, shifted once in f32 at construction like diffusers.
        let s = 1.0f32 / TRAIN_STEPS as f32;
        let sh = shift as f32;
        let sigma_min = f64::from((sh * s) / (1.0 + (sh - 1.0) * s));
        let sigma_max = 1.0f64;
        // np.linspace(sigma_max * 1000, sigma_min * 1000, steps), then shifted again.
        let (start, stop) = (sigma_max * TRAIN_STEPS, sigma_min * TRAIN_STEPS);
        let ts: Vec<f64> = if steps == 1 {
            vec![start]
        } else {
            let step = (stop - start) / (steps - 1) as f64;
            (0..steps)
                .map(|i| {
                    if i + 1 == steps {
                        stop
                    } else {
                        i as f64 * step + start
                    }
                })
                .collect()
        };
        let mut sigmas: Vec<f32> = ts
            .iter()
            .map(|t| shift_sigma(shift, t / TRAIN_STEPS) as f32)
            .collect();
        let timesteps = sigmas.iter().map(|s| s * TRAIN_STEPS as f32).collect();
        sigmas.push(0.0);
        Self { timesteps, sigmas }
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    /// Whether the schedule has no step.
    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// `sigma[i+1] - sigma[i]`, the Euler step size (f32 like the reference).
    pub fn dt(&self, i: usize) -> f32 {
        self.sigmas[i + 1] - self.sigmas[i]
    }
}

#[cfg(test)]
mod tests {
    use super::FlowMatchSchedule;

    #[test]
    fn schedule_starts_at_full_noise_and_ends_at_zero() {
        let s = FlowMatchSchedule::new(4, 3.0);
        assert_eq!(s.len(), 4);
        assert_eq!(s.sigmas.len(), 5);
        assert_eq!(s.sigmas[0], 1.0);
        assert_eq!(s.timesteps[0], 1000.0);
        assert_eq!(*s.sigmas.last().unwrap(), 0.0);
        assert!(s.sigmas.windows(2).all(|w| w[0] > w[1]));
        assert!((0..4).all(|i| s.dt(i) < 0.0));
        assert_eq!(FlowMatchSchedule::new(1, 3.0).sigmas, vec![1.0, 0.0]);
    }
}
