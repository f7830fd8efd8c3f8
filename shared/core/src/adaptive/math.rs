//! The two functions of `f64` the controllers need that `core` does not have (`sqrt`, `exp`
//! live in `std`): deterministic, exact enough for limits and weights, the same natively and on
//! wasm32.

/// The square root of `x` (`0` for `x <= 0` or not finite): Newton's iteration from a
/// power-of-two first guess, to full precision.
pub fn sqrt(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 || x.is_infinite() {
        return 0.0;
    }
    // A first guess within a factor of 2: halve the binary exponent.
    let bits = x.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut y = f64::from_bits((((exponent / 2) + 1023) as u64) << 52);
    for _ in 0..8 {
        y = 0.5 * (y + x / y);
    }
    y
}

/// `e^(-x)` for `x >= 0` (`1` for `x <= 0`, `0` past 700): the argument is halved until it is
/// small, a Taylor series gives the small value, and squaring undoes the halving.
pub fn exp_neg(x: f64) -> f64 {
    if x.is_nan() || x <= 0.0 {
        return 1.0;
    }
    if x > 700.0 {
        return 0.0;
    }
    let mut halvings = 0;
    let mut r = x;
    while r > 1.0 / 1024.0 {
        r *= 0.5;
        halvings += 1;
    }
    // e^(-r) for r <= 2^-10: six terms are exact to f64 precision.
    let mut term = 1.0;
    let mut sum = 1.0;
    for k in 1..7 {
        term *= -r / f64::from(k);
        sum += term;
    }
    for _ in 0..halvings {
        sum *= sum;
    }
    sum
}

#[cfg(test)]
mod tests {
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    use super::*;

    #[test]
    fn square_roots() {
        for (x, want) in [
            (4.0, 2.0),
            (2.0, core::f64::consts::SQRT_2),
            (3.75, 1.936_491_673_103_708_5),
            (1e6, 1e3),
            (0.25, 0.5),
        ] {
            assert!(
                (sqrt(x) - want).abs() < 1e-12 * want.max(1.0),
                "sqrt({x}) = {}",
                sqrt(x)
            );
        }
        assert_eq!(sqrt(0.0), 0.0);
        assert_eq!(sqrt(-1.0), 0.0);
    }

    #[test]
    fn exponentials() {
        for (x, want) in [
            (1.0, 0.367_879_441_171_442_33),
            (0.1, 0.904_837_418_035_959_6),
            (5.0, 0.006_737_946_999_085_467),
            (0.0, 1.0),
        ] {
            assert!(
                (exp_neg(x) - want).abs() < 1e-12,
                "exp(-{x}) = {}",
                exp_neg(x)
            );
        }
        assert_eq!(exp_neg(1000.0), 0.0);
    }
}
