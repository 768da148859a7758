//! Property tests: the vocabulary round-trips any text; the batch iterator covers every window
//! at most once per epoch (all but the dropped remainder), with targets = inputs shifted by one.

use minigpt::data::{num_windows, Batches, Shuffle, Vocab};
use proptest::prelude::*;

fn shuffle() -> impl Strategy<Value = Shuffle> {
    prop_oneof![Just(Shuffle::None), Just(Shuffle::Global), (1usize..64).prop_map(Shuffle::Buffer)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn vocabulary_round_trips_any_text(text in "\\PC{1,200}") {
        let vocab = Vocab::from_text(&text);
        let ids = vocab.encode(&text).unwrap();
        prop_assert_eq!(vocab.decode(&ids), text.clone());
        // sorted(set(text)), as the notebook builds it.
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort();
        chars.dedup();
        prop_assert_eq!(vocab.chars(), &chars[..]);
        prop_assert!(ids.iter().all(|&i| i >= 0 && (i as usize) < vocab.len()));
        let again = Vocab::from_strings(&vocab.to_strings()).unwrap();
        prop_assert_eq!(again.chars(), vocab.chars());
    }

    #[test]
    fn unknown_characters_are_named(text in "[a-m]{1,50}", extra in "[n-z]{1,5}") {
        let vocab = Vocab::from_text(&text);
        let err = vocab.encode(&format!("{text}{extra}")).unwrap_err();
        // Each missing character once, in order of appearance.
        let mut missing: Vec<char> = Vec::new();
        for c in extra.chars() {
            if !missing.contains(&c) {
                missing.push(c);
            }
        }
        prop_assert_eq!(err.0, missing);
    }

    #[test]
    fn an_epoch_covers_each_window_at_most_once(
        len in 2usize..400,
        block in 1usize..16,
        batch in 1usize..8,
        shuffle in shuffle(),
        seed in any::<u64>(),
        epoch in 0u64..4,
    ) {
        prop_assume!(len > block);
        // Token i is i: a window's first token names its start.
        let data: Vec<i32> = (0..len as i32).collect();
        let windows = num_windows(len, block);
        let mut batches = Batches::new(&data, block, batch, shuffle, seed, epoch);
        let (mut x, mut y) = (vec![0; batch * block], vec![0; batch * block]);
        let mut starts = Vec::new();
        while batches.fill(&mut x, &mut y) {
            for row in 0..batch {
                let (xr, yr) = (&x[row * block..(row + 1) * block], &y[row * block..(row + 1) * block]);
                let start = xr[0] as usize;
                prop_assert_eq!(xr, &data[start..start + block]);
                prop_assert_eq!(yr, &data[start + 1..start + block + 1]);
                starts.push(start);
            }
        }
        prop_assert_eq!(starts.len() / batch, Batches::len(len, block, batch));
        prop_assert_eq!(starts.len(), windows / batch * batch);
        let mut sorted = starts.clone();
        sorted.sort();
        sorted.dedup();
        prop_assert_eq!(sorted.len(), starts.len(), "a window came twice");
        prop_assert!(sorted.iter().all(|&s| s < windows));
        if shuffle == Shuffle::None {
            prop_assert_eq!(&starts, &(0..windows / batch * batch).collect::<Vec<_>>());
        }
        // The same seed and epoch replay the same order.
        let mut replay = Batches::new(&data, block, batch, shuffle, seed, epoch);
        let (mut x2, mut y2) = (vec![0; batch * block], vec![0; batch * block]);
        let mut replayed = Vec::new();
        while replay.fill(&mut x2, &mut y2) {
            replayed.extend((0..batch).map(|r| x2[r * block] as usize));
        }
        prop_assert_eq!(replayed, starts);
    }
}
