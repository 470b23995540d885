//! Tag filter expressions: `*` or `tagA || tagB`.

use txmq_proto::v2::Code;

use crate::error::BrokerError;

/// Which tags a subscription takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Filter {
    /// Every message.
    All,
    /// Messages with one of these tags.
    Tags(Vec<String>),
}

impl Filter {
    /// Parses a tag expression (`*`, empty, or tags separated by `||`).
    ///
    /// # Errors
    /// `ILLEGAL_FILTER_EXPRESSION` for an expression with an empty tag.
    pub fn tags(expr: &str) -> Result<Self, BrokerError> {
        let expr = expr.trim();
        if expr.is_empty() || expr == "*" {
            return Ok(Self::All);
        }
        let tags: Vec<String> = expr.split("||").map(|t| t.trim().to_string()).collect();
        if tags.iter().any(String::is_empty) {
            return Err(BrokerError::new(
                Code::IllegalFilterExpression,
                format!("illegal tag expression {expr:?}"),
            ));
        }
        Ok(Self::Tags(tags))
    }

    /// Whether a message with `tag` passes.
    pub fn matches(&self, tag: &str) -> bool {
        match self {
            Self::All => true,
            Self::Tags(tags) => tags.iter().any(|t| t == tag),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_expressions_select_by_tag() {
        assert_eq!(Filter::tags("*").unwrap(), Filter::All);
        let f = Filter::tags("paid || shipped").unwrap();
        assert!(f.matches("paid") && f.matches("shipped") && !f.matches("created"));
        assert!(Filter::tags("a||").is_err());
    }
}
