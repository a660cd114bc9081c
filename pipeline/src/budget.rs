//! `--tokens`: a token budget written as `1.97B`, `500M`, `250K` or `1970000000`.

/// Parses a positive token count with an optional K/M/B (or k/m/b) suffix, e.g. `1.97B`.
pub fn parse_tokens(s: &str) -> Result<u64, String> {
    let hint = "hint: write a positive count such as 1.97B, 500M, 250K or 1970000000";
    let t = s.trim().replace('_', "");
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('b' | 'B' | 'g' | 'G') => (&t[..t.len() - 1], 1e9),
        _ => (t.as_str(), 1.0),
    };
    if let (1.0, Ok(n)) = (mult, num.parse::<u64>()) {
        return if n == 0 {
            Err(format!("`{s}` is zero; {hint}"))
        } else {
            Ok(n)
        };
    }
    let x: f64 = num
        .parse()
        .ok()
        .filter(|x: &f64| x.is_finite() && !num.starts_with(['+', '-']))
        .ok_or_else(|| format!("`{s}` is not a token count; {hint}"))?;
    let n = (x * mult).round();
    if n < 1.0 {
        return Err(format!("`{s}` is zero; {hint}"));
    }
    if n > 1e18 {
        return Err(format!("`{s}` is too large; {hint}"));
    }
    Ok(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_forms() {
        assert_eq!(parse_tokens("1.97B"), Ok(1_970_000_000));
        assert_eq!(parse_tokens("500M"), Ok(500_000_000));
        assert_eq!(parse_tokens("250K"), Ok(250_000));
        assert_eq!(parse_tokens("100k"), Ok(100_000));
        assert_eq!(parse_tokens("1970000000"), Ok(1_970_000_000));
        assert_eq!(parse_tokens("1_000"), Ok(1_000));
    }

    #[test]
    fn rejects_zero_words_and_negatives_with_a_hint() {
        for bad in ["0", "0K", "lots", "", "-5", "1.5X", "nanB", "K"] {
            let err = parse_tokens(bad).unwrap_err();
            assert!(err.contains("hint:"), "{bad}: {err}");
        }
    }
}
