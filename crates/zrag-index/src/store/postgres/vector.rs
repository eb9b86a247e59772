//! pgvector's `vector` type in binary form: `u16` dimension, `u16` unused, then the
//! components as big-endian `f32`. Binary both ways (parameters, COPY, results), so a vector
//! goes in and comes out bit for bit.

use std::error::Error;

use bytes::{BufMut, BytesMut};
use postgres::types::{to_sql_checked, FromSql, IsNull, ToSql, Type};

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PgVector(pub Vec<f32>);

#[derive(Clone, Copy, Debug)]
pub(crate) struct PgVectorRef<'a>(pub &'a [f32]);

fn write(values: &[f32], out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
    let dim = u16::try_from(values.len()).map_err(|_| "vector longer than 65535")?;
    out.reserve(4 + 4 * values.len());
    out.put_u16(dim);
    out.put_u16(0);
    for v in values {
        out.put_f32(*v);
    }
    Ok(IsNull::No)
}

impl ToSql for PgVectorRef<'_> {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        write(self.0, out)
    }
    fn accepts(ty: &Type) -> bool {
        ty.name() == "vector"
    }
    to_sql_checked!();
}

impl<'a> FromSql<'a> for PgVector {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, Box<dyn Error + Sync + Send>> {
        if raw.len() < 4 {
            return Err("vector value shorter than its header".into());
        }
        let dim = u16::from_be_bytes([raw[0], raw[1]]) as usize;
        let body = &raw[4..];
        if body.len() != 4 * dim {
            return Err(format!("vector of dimension {dim} carries {} bytes", body.len()).into());
        }
        Ok(PgVector(
            body.chunks_exact(4)
                .map(|b| f32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ))
    }
    fn accepts(ty: &Type) -> bool {
        ty.name() == "vector"
    }
}
