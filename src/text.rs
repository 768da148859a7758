//! Text shared by every command's output: numbers with thousands separators, and messages
//! folded onto one line.

/// 1234567 → "1,234,567".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `text` on one line: TensorFlow's messages can span lines (`\n\t [[{{node ...}}]]`).
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An error and its causes (`{:#}`) on one line.
pub fn error_line(e: &anyhow::Error) -> String {
    one_line(&format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_groups_digits() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(1000), "1,000");
        assert_eq!(super::thousands(818_241), "818,241");
        assert_eq!(super::thousands(1_234_567), "1,234,567");
    }
}
